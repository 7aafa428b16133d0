"""rayfleet.cluster: the Ray Serve application (ingress, LLMServer replicas), its config and CLI.

Read in this order: config.py (the config tree), protocol.py (OpenAI shapes), ingress.py
(HTTP -> token ids -> DeploymentHandle), llm_server.py (one replica, one AsyncLLMEngine),
metrics.py, app.py (`build_app`), cli.py (`rayfleet`). Nothing is imported here, so
`rayfleet --help` stays fast.
"""
