"""Several processes: the launcher, its relay, the worker, the cluster-script export, and sharded state."""
