"""Test support: the network-namespace host cluster (sshd per host) and a real Slurm on it."""
