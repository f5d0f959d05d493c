"""python -m cityflux"""

from cityflux.cli import main

main()
