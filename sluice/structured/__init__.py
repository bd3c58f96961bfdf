"""Constrained decoding: what a request asks its output to match (`spec`), compiled into token
masks by a grammar engine (`grammar`)."""
