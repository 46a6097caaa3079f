"""`spdbench doctor`: the machine's checks, the attack x dtype bench and the protocol's cost."""
