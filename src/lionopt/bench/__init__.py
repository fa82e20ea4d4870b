"""``lionopt bench``: timing Lion steps against AdamW, peer libraries and the memory roofline.

- ``presets``: parameter lists (GPT-like, GPT-2 small, one large tensor, many small tensors);
- ``impls``: what is timed (lionopt's paths, the official eager loop, torch AdamW, peers);
- ``core``: the measurement (interleaved medians, ideal bytes, roofline, extra peak memory);
- ``report``: the terminal table, JSON and bar chart. The command is ``lionopt.cli.bench``.
"""
