"""Domain code: inference, training, metrics, reports, importing, prompting.

A plain package with no Celery, database or HTTP import (checked by import-linter in ``make lint``):
workers, benchmarks and tests call it directly.
"""
