"""Loading SAM checkpoints, choosing what trains, architectures, conversion of original checkpoints."""
