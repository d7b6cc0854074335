//! `petl-probe`: what the end-to-end tests run inside a pod (image `localhost/petl-probe`) to
//! check the node's wiring: the API server through the `kubernetes` Service, DNS, pod-to-pod TCP.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, PostParams};

#[derive(Parser)]
#[command(
    name = "petl-probe",
    version,
    about = "Checks a pod's view of the cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Asks the API server who this pod is (a SelfSubjectReview with the pod's service-account
    /// token, in-cluster config: KUBERNETES_SERVICE_HOST/PORT and the mounted CA); prints
    /// `user: NAME` and `version: VERSION`.
    Api,
    /// Resolves each name (the pod's resolver: /etc/resolv.conf, search domains); prints
    /// `NAME -> ADDRESS` and retries until all resolve or the timeout passes.
    Resolve {
        names: Vec<String>,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Serves TCP on 0.0.0.0:PORT for ever: reads one line per connection and answers
    /// `NAME got LINE`, printing each exchange.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
    },
    /// One exchange with a peer running the same command: serves PORT as `serve` does until it
    /// answered one connection, meanwhile connects to PEER (HOST:PORT, retrying until the
    /// timeout), sends `hello from NAME` and prints `reply: LINE`; then exits.
    Exchange {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        #[arg(long)]
        peer: String,
        #[arg(long, default_value_t = 90)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Api => api(),
        Command::Resolve {
            names,
            timeout_secs,
        } => resolve(&names, Duration::from_secs(timeout_secs)),
        Command::Serve { port, name } => serve(port, &name, None),
        Command::Exchange {
            port,
            name,
            peer,
            timeout_secs,
        } => exchange(port, &name, &peer, Duration::from_secs(timeout_secs)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("petl-probe: {message}");
            ExitCode::FAILURE
        }
    }
}

fn api() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("in-cluster config: {e}"))?;
        let review = Api::<SelfSubjectReview>::all(client.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .map_err(|e| format!("SelfSubjectReview: {e}"))?;
        let user = review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .ok_or("the SelfSubjectReview came back without a user")?;
        let version = client
            .apiserver_version()
            .await
            .map_err(|e| format!("/version: {e}"))?;
        println!("user: {user}");
        println!("version: {}", version.git_version);
        Ok(())
    })
}

fn resolve(names: &[String], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    for name in names {
        loop {
            match (name.as_str(), 0).to_socket_addrs() {
                Ok(mut addresses) => {
                    if let Some(address) = addresses.next() {
                        println!("{name} -> {}", address.ip());
                        break;
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("{name} did not resolve within {timeout:?}: {e}"));
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn listen(port: u16) -> Result<TcpListener, String> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("binding port {port}: {e}"))?;
    println!("serving on port {port}");
    Ok(listener)
}

/// Answers connections on `port`; for ever, or until `answers` connections were answered.
fn serve(port: u16, name: &str, answers: Option<usize>) -> Result<(), String> {
    serve_on(&listen(port)?, name, answers);
    Ok(())
}

fn serve_on(listener: &TcpListener, name: &str, answers: Option<usize>) {
    let mut answered = 0;
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map_or("unknown".into(), |a| a.to_string());
        let mut line = String::new();
        let read = BufReader::new(&stream).read_line(&mut line);
        if let Err(e) = read {
            eprintln!("reading from {peer}: {e}");
            continue;
        }
        let line = line.trim_end();
        println!("from {peer}: {line}");
        match writeln!(stream, "{name} got {line}") {
            Ok(()) => answered += 1,
            Err(e) => eprintln!("answering {peer}: {e}"),
        }
        if answers.is_some_and(|n| answered >= n) {
            return;
        }
    }
}

fn exchange(port: u16, name: &str, peer: &str, timeout: Duration) -> Result<(), String> {
    let listener = listen(port)?;
    let server_name = name.to_string();
    let server = std::thread::spawn(move || serve_on(&listener, &server_name, Some(1)));
    connect(peer, &format!("hello from {name}"), timeout)?;
    // The peer connects to us as we did to it; wait for that within the same deadline.
    let deadline = Instant::now() + timeout;
    while !server.is_finished() {
        if Instant::now() > deadline {
            return Err(format!("{peer} did not connect back within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    server
        .join()
        .map_err(|_| "the server thread panicked".to_string())
}

fn connect(address: &str, message: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        let attempt = address
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addresses| addresses.next().ok_or_else(|| "no address".to_string()))
            .and_then(|a| {
                TcpStream::connect_timeout(&a, Duration::from_secs(5)).map_err(|e| e.to_string())
            });
        match attempt {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("connecting to {address} within {timeout:?}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    (&stream)
        .write_all(format!("{message}\n").as_bytes())
        .map_err(|e| format!("sending to {peer}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reading from {peer}: {e}"))?;
    println!("connected to {peer}");
    println!("reply: {}", reply.trim_end());
    Ok(())
}
