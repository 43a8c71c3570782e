"""The running agent: lifecycle, study assembly, the job queue, the worker and the outbox."""
