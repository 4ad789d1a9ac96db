"""The answer memory: a team's approved answers, embedded and searchable.

``embedder`` (MiniLM through ONNX Runtime: no torch, so the API can embed a search query too),
``export`` (turns the shipped MiniLM into that ONNX file once; needs torch, so workers and the CLI
run it), ``index`` (a usearch vector index), ``memory`` (entries + their message and reply
indexes: search, intent votes) and ``grounding`` (exemplars for prompts, the placeholder
contract).
"""
