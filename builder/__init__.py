"""builder: a daemonless Dockerfile-to-OCI-image builder."""
