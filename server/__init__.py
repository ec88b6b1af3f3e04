"""``qwenvl-edge serve``: OpenAI's chat API and a photo page over one bundle (the ``server`` extra)."""
