"""What tracks vLLM's releases: its flags, its data-parallel modes, P/D requests, env names, the side channel.

Each module names the vLLM release its facts were read from; the real-vLLM
tests and ``scripts/vllm_wire_history.py`` compare them with installed vLLM.
Shared by the head, the agents and the ranks; only ``sidechannel`` does I/O.
"""
