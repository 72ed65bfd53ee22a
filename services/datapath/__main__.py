from services.datapath.main import main

main()
