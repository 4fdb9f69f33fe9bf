from skyfleet.cli.app import main

main()
