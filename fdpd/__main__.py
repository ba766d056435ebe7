from fdpd.cli import main

main()
