"""One pickle machine and the policies that use it.

``machine`` interprets a pickle's opcodes with the C unpickler's semantics; ``reading`` (inert
records and stubs), ``uses`` (scanning: which globals, and how each is used), ``rewriting`` (a
pickle's storage location tags replaced in its bytes) and ``allowlist`` (torch's weights_only allow
list as ckpttool's own table) are what the commands put on top of it.
"""
