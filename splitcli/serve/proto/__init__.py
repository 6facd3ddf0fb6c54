"""The wire protocol (split.proto) and its generated, checked-in Python modules."""
