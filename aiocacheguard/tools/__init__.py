"""Tools built on the library: the stampede bench and the ``aiocacheguard`` command line."""
