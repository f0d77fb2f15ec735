"""CHK immutable files: encoding parameters, share layout, streaming encoder and verifying decoder."""
