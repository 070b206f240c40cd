"""`imgtxt demo`: the whole system end to end on embedded defaults (the README's first command)."""
