"""One pickle machine and the policies that use it.

``machine`` interprets a pickle's opcodes with the C unpickler's semantics; ``reading`` (inert
records and stubs), ``scanning`` (which globals, and how each is used) and ``allowlist`` (torch's
weights_only allow list as ckpttool's own table) are what the commands put on top of it.
"""
