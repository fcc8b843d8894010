"""featcache: the application layer (CLI, demo, audit) over featstore, pipelines and trainer."""

__version__ = "0.1.0"
