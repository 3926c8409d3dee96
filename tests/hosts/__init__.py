"""Hosts for the fault tests: network namespaces joined by a bridge (`rig.Rig`), the
faults they can suffer, the programs run inside them, and a delaying TCP relay
(`delayer.py`) for delay and jitter on a kernel without netem. See rig.py."""
