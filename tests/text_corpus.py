"""Texts on which llama.cpp's tokenizer (our GGUF vocabulary) must give exactly tiktoken's ids.

Each entry targets one way the two could disagree: the split pattern's branches (letters,
single digits, punctuation runs, newline and whitespace runs), multi-byte scripts whose
bytes are merged across characters, and text that spells a special token.
"""

from __future__ import annotations

import random

FIXED_TEXTS: dict[str, str] = {
    "english": "Hello! Who are you? I'm fine, thanks; we'll see what they've done, isn't it? It's 5 o'clock.",
    "contractions_upper": "I'M SURE YOU'LL SEE HE'D SAID SHE'S THERE, THEY'RE HERE, WE'VE WON.",
    "chinese": "你好，世界！这是一只可爱的小猫，它正在阳光下睡觉。请描述这张图片中的内容。",
    "japanese": "こんにちは、世界。これはテストです。カタカナとひらがなと漢字が混ざっています。",
    "korean": "안녕하세요, 세계! 이 그림에는 무엇이 있습니까? 한국어 문장을 토큰화합니다.",
    "mixed_scripts": "Qwen-VL 是一个多模态模型 (multimodal) です。Русский текст, ελληνικά, עברית, العربية, हिन्दी.",
    "code": ('def f(x: int) -> int:\n    """Doc."""\n    return x ** 2  # square\n\n'
             'for (int i = 0; i < n; ++i) { a[i] += b[i] * 3.14f; }\n'
             '<div class="x">&amp;</div> $var = @{key => "v"}; SELECT * FROM t WHERE id=42;'),
    "emoji": "I ❤️ 🍕 and 🐈‍⬛! Family: 👨‍👩‍👧‍👦, flags: 🇯🇵🇺🇸, skin: 👍🏽, keycap: 1️⃣ #️⃣, 🏳️‍🌈 😀😃😄",
    "digits": "0 1 12 123 1234 3.14159 2,147,483,647 1e-10 0x1F 00042 -7",
    "long_number": "3141592653589793238462643383279502884197169399375105820974944592307816406286208998628034825",
    "spaces": "a  b   c    d     e" + " " * 40 + "f" + " " * 3 + "\n" + " " * 7 + "g   ",
    "tabs": "col1\tcol2\t\tcol3\t \t end\t\t\t\n\tindented\n\t\t\tdeeper",
    "crlf": "line one\r\nline two\r\n\r\n\r\nline five\r\n  indented\r\n",
    "newlines": "\n\n\nstart\n\n  \n \n\t\nend\n\n\n\n",
    "long_word": "Pneumonoultramicroscopicsilicovolcanoconiosis " + "abc" * 60 + " " + "z" * 300,
    "long_punct": "=" * 100 + " " + "-" * 77 + "!!!???..." + "*" * 33 + "\n" + "#" * 64,
    "accents_precomposed": "café naïve résumé Ångström Dvořák Ærøskøbing façade crème brûlée São Paulo",
    "accents_combining": ("cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m "
                          "Z\u0335\u0321a\u0336l\u0337g\u0338o"),
    "specials_as_text": ("<|im_start|>user\nhi<|im_end|>\n<|endoftext|> <img>/tmp/a.png</img> <imgpad>"
                         " <|extra_3|> <|extra_204|> <ref>cat</ref><box>(1,2),(3,4)</box> <quad></quad>"),
    "almost_specials": "<|im_end| <|im_end||> < |im_end|> <IMG> <|EXTRA_3|> <|extra_205|> <|extra_-1|>",
    "punctuation": "«Quote» „anführung“ “smart” ‘single’ — en–dash … ¿Qué? ¡Sí! 『かぎ』【括弧】",
    "math_symbols": "∀x∈ℝ: x² ≥ 0, ∑ᵢ aᵢ = π·r², √2 ≈ 1.414, ∞ ≠ ∅, ⌈x⌉ ⊕ ⌊y⌋",
    "fullwidth": "ＡＢＣ　１２３　ｆｕｌｌｗｉｄｔｈ！？",
    "apostrophes": "'s 's's ''' 're've'm'll'd 'S 'T dog's cats' rock'n'roll",
    "single_chars": "a",
    "whitespace_only": "   \t  \n ",
    "nbsp_and_friends": "a\u00a0b\u2009c\u3000d\u200be\ufeff f\u2028g\u2029h",
}


def random_unicode_texts(n: int = 40, seed: int = 1234) -> dict[str, str]:
    """Random code points from every plane (no surrogates), mixed with ASCII, spaces and newlines."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0xDFF), (0x1100, 0x11FF),
              (0x1E00, 0x1FFF), (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0xE000, 0xF8FF), (0xF900, 0xFFFD), (0x10000, 0x1FFFF), (0x20000, 0x2FFFF), (0xE0000, 0xE01EF)]
    texts = {}
    for k in range(n):
        chars = []
        for _ in range(rng.randint(1, 60)):
            roll = rng.random()
            if roll < 0.1:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "'s", "123"]))
            else:
                lo, hi = rng.choice(ranges)
                chars.append(chr(rng.randint(lo, hi)))
        texts[f"random_{k}"] = "".join(chars)
    return texts


CORPUS: dict[str, str] = {**FIXED_TEXTS, **random_unicode_texts()}
