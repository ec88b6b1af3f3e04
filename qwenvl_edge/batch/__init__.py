"""``qwenvl-edge batch IN OUT``: many questions answered into a file, resumably, in this process or over a Ray
cluster (``--ray``).

- ``rows``: the input (JSONL lines of ``run --batch`` with an optional ``id``, or Parquet), each row checked by
  ``run --batch``'s own line checks; duplicate ids refused before any work.
- ``output``: OUT as JSONL (appended, flushed and fsynced batch by batch) or as a Parquet folder of part files
  (each written atomically); the ids already in OUT are the rows a rerun skips.
- ``answer``: one model copy (a process, or a Ray actor) that checks its bundle's sha256 sums, then answers.
- ``local`` and ``on_ray``: the two runners, the same rows out; ``on_ray`` is the only module that imports ray.
- ``command``: the CLI body (``cmd_batch``).
"""
