"""Distributed training support: DTensor parameters (``sharded``) and data-parallel variants."""
