"""Hosts for the fault tests: network namespaces joined by a bridge (`rig.Rig`), the
faults they can suffer, the programs run inside them, and delay and jitter on a kernel
without netem: a packet delay line (`delayline.py`) and a delaying TCP relay
(`delayer.py`). See rig.py."""
