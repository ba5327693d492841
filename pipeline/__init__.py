"""kdcache library: capture a teacher's targets once, train students from the cache."""
