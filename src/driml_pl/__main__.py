from driml_pl.cli import main

main()
