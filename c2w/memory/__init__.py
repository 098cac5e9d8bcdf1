"""The parts of the c2w learner: adapter bank, write gate, training views, episodic buffer, rehearsal."""
