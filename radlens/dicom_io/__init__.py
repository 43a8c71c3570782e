"""Everything that knows DICOM: the listener, the spool, sending, pixel decoding, the writers."""
