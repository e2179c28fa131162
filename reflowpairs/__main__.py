from reflowpairs.cli import main

main()
