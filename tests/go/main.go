// podiam-go-client: the AWS SDKs for Go (v1 and v2) as pods run them, with their own
// instance-metadata code and defaults, for the tests (tests/src/world/clients.rs,
// tests/src/sdk_load.rs). Built by scripts/setup from Debian's SDK packages.
//
//	podiam-go-client identity -sdk v1|v2 -sts URL
//	    The default credential chain, then STS GetCallerIdentity at URL: prints the
//	    caller's ARN and the seconds the credentials have left, one per line.
//	podiam-go-client load -sdk v1|v2 -stop FILE -min-left SECS -pause SECS
//	    ONE EC2 role provider (and its metadata client, token and connections) for the
//	    process's life, asked for credentials in a loop until FILE exists: one line per
//	    fetch, "ok EPOCH - MS" or "fail EPOCH MS WHY".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	awsv1 "github.com/aws/aws-sdk-go/aws"
	ec2credsv1 "github.com/aws/aws-sdk-go/aws/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go/aws/ec2metadata"
	"github.com/aws/aws-sdk-go/aws/session"
	stsv1 "github.com/aws/aws-sdk-go/service/sts"

	"github.com/aws/aws-sdk-go-v2/config"
	ec2credsv2 "github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	stsv2 "github.com/aws/aws-sdk-go-v2/service/sts"
)

func main() {
	if len(os.Args) < 2 {
		fail("usage: podiam-go-client identity|load [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	sdk := flags.String("sdk", "v2", "v1 or v2")
	stsURL := flags.String("sts", "", "STS endpoint (identity)")
	stop := flags.String("stop", "", "stop file (load)")
	minLeft := flags.Float64("min-left", 0, "seconds credentials must have left (load)")
	pause := flags.Float64("pause", 0.2, "seconds between fetches (load)")
	if err := flags.Parse(os.Args[2:]); err != nil {
		fail(err.Error())
	}
	if *sdk != "v1" && *sdk != "v2" {
		fail("-sdk must be v1 or v2")
	}
	switch os.Args[1] {
	case "identity":
		arn, expires, err := identity(*sdk, *stsURL)
		if err != nil {
			fail(err.Error())
		}
		fmt.Println(arn)
		fmt.Println(int64(time.Until(expires).Seconds()))
	case "load":
		fetch := v2Provider()
		if *sdk == "v1" {
			fetch = v1Provider()
		}
		load(fetch, *stop, *minLeft, *pause)
	default:
		fail("unknown command " + os.Args[1])
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, message)
	os.Exit(1)
}

// identity: the SDK's default credential chain, which must end at the EC2 role provider,
// then GetCallerIdentity with what it gave; the caller's ARN and when those credentials expire
// (v1: when the EC2 role provider's next credentials do).
func identity(sdk, url string) (string, time.Time, error) {
	if url == "" {
		return "", time.Time{}, errors.New("-sts is required")
	}
	if sdk == "v1" {
		sess, err := session.NewSession(&awsv1.Config{Region: awsv1.String("us-east-1")})
		if err != nil {
			return "", time.Time{}, err
		}
		value, err := sess.Config.Credentials.Get()
		if err != nil {
			return "", time.Time{}, err
		}
		if value.ProviderName != ec2credsv1.ProviderName {
			return "", time.Time{}, fmt.Errorf("credentials came from %s, not %s", value.ProviderName, ec2credsv1.ProviderName)
		}
		// v1's chain does not tell when what it gave expires; one more fetch by an EC2 role
		// provider of its own does.
		expires, err := v1Provider()()
		if err != nil {
			return "", time.Time{}, err
		}
		out, err := stsv1.New(sess, &awsv1.Config{Endpoint: awsv1.String(url)}).GetCallerIdentity(&stsv1.GetCallerIdentityInput{})
		if err != nil {
			return "", time.Time{}, err
		}
		return awsv1.StringValue(out.Arn), expires, nil
	}
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"))
	if err != nil {
		return "", time.Time{}, err
	}
	creds, err := cfg.Credentials.Retrieve(ctx)
	if err != nil {
		return "", time.Time{}, err
	}
	if creds.Source != ec2credsv2.ProviderName {
		return "", time.Time{}, fmt.Errorf("credentials came from %s, not %s", creds.Source, ec2credsv2.ProviderName)
	}
	client := stsv2.NewFromConfig(cfg, func(o *stsv2.Options) {
		o.EndpointResolver = stsv2.EndpointResolverFromURL(url)
	})
	out, err := client.GetCallerIdentity(ctx, &stsv2.GetCallerIdentityInput{})
	if err != nil {
		return "", time.Time{}, err
	}
	return *out.Arn, creds.Expires, nil
}

// v1Provider: one EC2RoleProvider over one ec2metadata client (its IMDSv2 token cached for
// 6 hours), as a v1 session's credential chain holds them, each fetch asking the service.
func v1Provider() func() (time.Time, error) {
	sess, err := session.NewSession(&awsv1.Config{Region: awsv1.String("us-east-1")})
	if err != nil {
		fail(err.Error())
	}
	provider := &ec2credsv1.EC2RoleProvider{Client: ec2metadata.New(sess)}
	return func() (time.Time, error) {
		value, err := provider.Retrieve()
		if err != nil {
			return time.Time{}, err
		}
		if value.SessionToken == "" {
			return time.Time{}, errors.New("no session token")
		}
		return provider.ExpiresAt(), nil
	}
}

// v2Provider: one ec2rolecreds provider over one imds client with its defaults (its token
// cached for 5 minutes), without the credentials cache LoadDefaultConfig puts around it: every
// fetch asks the metadata service.
func v2Provider() func() (time.Time, error) {
	provider := ec2credsv2.New()
	return func() (time.Time, error) {
		creds, err := provider.Retrieve(context.Background())
		if err != nil {
			return time.Time{}, err
		}
		if creds.SessionToken == "" {
			return time.Time{}, errors.New("no session token")
		}
		return creds.Expires, nil
	}
}

func load(fetch func() (time.Time, error), stop string, minLeft, pause float64) {
	if stop == "" {
		fail("-stop is required")
	}
	for {
		if _, err := os.Stat(stop); err == nil {
			return
		}
		began := time.Now()
		expires, err := fetch()
		took := time.Since(began).Milliseconds()
		at := float64(began.UnixNano()) / 1e9
		why := ""
		if err != nil {
			why = strings.ReplaceAll(err.Error(), "\n", " ")
		} else if left := time.Until(expires).Seconds(); left < minLeft {
			why = fmt.Sprintf("only %ds left", int64(left))
		}
		if why != "" {
			fmt.Printf("fail %.3f %d %s\n", at, took, why)
		} else {
			fmt.Printf("ok %.3f - %d\n", at, took)
		}
		time.Sleep(time.Duration(pause * float64(time.Second)))
	}
}
