"""The export orchestration: runs the ``export/`` and ``quant/`` stages on a checkpoint and assembles the
bundle (``bundle_export``), with its resume folder and lock (``export_stages``), the checks and clean-up of
the output folder and signals (``export_target``) and the progress lines (``export_progress``). It sits above
``export/`` and ``quant/``, which never import each other, and below the CLI."""
