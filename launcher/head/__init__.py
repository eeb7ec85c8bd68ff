"""The head: one per job, where ``launcher`` was typed.

``job`` decides (a pure state machine), ``link`` talks to one host's agent,
``supervisor`` is the loop between them, ``reporter`` is what it tells a
person, ``pd_proxy`` fronts a prefill/decode job. Nothing here runs on the
hosts: an agent or a rank never imports this package (tests/test_layering.py).
"""
