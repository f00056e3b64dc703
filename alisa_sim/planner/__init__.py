"""Planners: choose a policy's parameters for a workload by searching a cost model."""
