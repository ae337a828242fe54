"""HHCL / Cluster-Contrast: DBSCAN pseudo-labels, the cluster memories, camera-aware proxies (CAP),
pseudo-label quality, and the method on the shared engine."""
