"""Code common to the ingress and the workers: config, channels, storage, partitioning, logging."""
