"""One sub-package per adapter method; each registers a :class:`~peftkit.registry.MethodSpec`."""
