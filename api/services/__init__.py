"""The logic routes share: each route is a thin HTTP mapping onto one of these functions.

Services raise ``HTTPException`` for a request a person must fix (4xx with a ``detail``) and
``csra.enqueue.QueueUnavailable`` when Redis is down (``api.main`` answers 503).
"""
