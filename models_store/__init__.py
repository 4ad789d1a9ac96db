"""The model store: one folder per model under ``<data dir>/models``.

Importing this package must stay cheap and torch-free (the API imports it for name
validation); the heavy loading code lives in ``models_store.loading``.
"""
