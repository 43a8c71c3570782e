"""Reading a researcher's own labelled folders, for every task: each folder layout is declared,
read as declared or detected without ambiguity, and refused (naming the files and the readings
that compete) when it could be read two ways or contradicts itself. ``radlens dataset check``
prints what was read before anything trains on it."""
