//! `kubectl-lockstep`: kubectl finds it on `PATH` and runs it as `kubectl lockstep`.

use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kubectl_lockstep::{Cli, Command, Ctx, Out, execute};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let out = Out::stdout();
    if let Command::Completion { .. } = cli.command {
        // No cluster needed.
        let ctx = Ctx {
            client: offline_client()?,
            namespace: String::new(),
            out,
        };
        return execute(cli.command, &ctx).await;
    }
    let opts = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &opts).await?
        }
        None if cli.context.is_some() => kube::Config::from_kubeconfig(&opts).await?,
        None => kube::Config::infer().await?,
    };
    let namespace = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let ctx = Ctx {
        client: kube::Client::try_from(config)?,
        namespace,
        out,
    };
    execute(cli.command, &ctx).await
}

/// A client that is never used (completion runs without a cluster).
fn offline_client() -> anyhow::Result<kube::Client> {
    let config = kube::Config::new("http://127.0.0.1:1".parse()?);
    Ok(kube::Client::try_from(config)?)
}
