"""Workers: the API client, the global limiter, the chunk pipeline and the Parquet sink.

``celery -A workers worker`` finds the Celery app in :mod:`workers.celery`. This package's own
import stays light: nothing here imports Celery until a worker or producer needs it.
"""
