"""Admission (DynamicBatcher) and iteration-level scheduling (Scheduler) of sequences."""
