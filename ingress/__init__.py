"""The thin ingress: verify, normalize, sequence, enqueue. Webhooks over HTTP; Discord over its gateway."""
