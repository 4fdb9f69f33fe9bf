"""Kubernetes: the fleet spec rendered as plain objects (``render``), offline schema checks
(``validate``), and the provider that scales each pool's StatefulSet (``provider``).

``kubernetes`` and ``kubernetes_validate`` are imported only by the modules that need them.
"""
