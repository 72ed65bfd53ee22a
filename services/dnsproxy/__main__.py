from services.dnsproxy.main import main

main()
