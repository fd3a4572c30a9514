"""What stages write and read back: atomic files, the exported-module format, the resume-identity check."""
