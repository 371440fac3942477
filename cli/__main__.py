from qbert.cli.main import main

main()
