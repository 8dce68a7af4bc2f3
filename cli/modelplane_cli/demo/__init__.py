"""`modelplane demo`: the router in front of local stand-in providers."""
