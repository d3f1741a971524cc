"""Students leave as stock diffusers pipelines: the writers of the pipeline folders and their model cards
(`pipeline.py`), and what is refused when a config is loaded because no stock pipeline could sample it (`checks.py`)."""
