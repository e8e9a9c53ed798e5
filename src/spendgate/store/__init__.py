"""Hot state in Redis: keys, Lua scripts and the store that runs them."""
